"""The scripts every method shares, one module each (``test``, ``inference``, ``gallery``, ``ablation``; export is
``common.export``, the server ``common.service``). A method's ``<method>/<script>.py`` binds one to its
:class:`common.spec.MethodSpec` with :func:`common.cli.script`. Each module reads its flags once, into a small
options object, at the top of its ``run_*`` function."""
