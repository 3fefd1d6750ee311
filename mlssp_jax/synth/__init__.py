"""Synthetic head-CT cohort: AVM-related vs other intracerebral hemorrhage, in HU.

Each subject is an analytic phantom of an adult head rendered straight onto its scanner grid:
scalp, skull (two cortical tables around diploe), skull base with orbits, sinuses, mastoids
and petrous ridges, face and neck with airway and spine, a headrest, CSF, grey and white
matter with sulci, deep grey nuclei, ventricles, the falx, and a hematoma of one of two
overlapping classes. Modules, in the data's path:

- :mod:`.settings`: the distributions the generator draws from, and named presets;
- :mod:`.geometry`: grids, analytic partial volume, ellipsoids;
- :mod:`.anatomy` and :mod:`.skull_base`: the head;
- :mod:`.lesions`: the hematoma (AVM vs other);
- :mod:`.scanner`: scanner grid, coverage, storage, blur, noise; one subject's scan;
- :mod:`.cohort`: files, ``manifest.csv``/``subjects.csv``, the cached default cohort, CLI.

``python -m mlssp_jax.synth --out DIR [--subjects 80 --avm 38 --seed 0 --preset default
--small]``. ``--small`` is a coarse scan (2-3 mm in-plane, 5 mm slices) of the same
normal-size heads and lesions.
"""

from mlssp_jax.synth.cohort import (
    FACT_FIELDS,
    FACTS_NAME,
    GENERATOR_VERSION,
    MANIFEST_NAME,
    cohort_labels,
    default_manifest,
    generate_cohort,
    main,
    subject_ids,
    write_subject,
)
from mlssp_jax.synth.scanner import render_subject, sample_subject
from mlssp_jax.synth.settings import PRESETS, Settings, for_scan, preset

__all__ = ["FACTS_NAME", "FACT_FIELDS", "GENERATOR_VERSION", "MANIFEST_NAME", "PRESETS",
           "Settings", "cohort_labels", "default_manifest", "for_scan",
           "generate_cohort", "main", "preset", "render_subject", "sample_subject",
           "subject_ids", "write_subject"]
