"""Stand-ins shipped with the package, as diffusers ships its ``testing_utils``: tiny random-weight models
in the official on-disk formats (:mod:`.tiny_models`) and the bundled demo clip (:mod:`.demo_media`).

The demo and the test suite build them from an installed copy, from any working directory; the
``scripts/`` command lines are thin wrappers around them.
"""
