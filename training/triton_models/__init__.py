"""The Triton Python-backend models of an fsar export.

``text_encoder.py``, ``video_encoder.py`` and ``fewshot_head.py`` are the ``model.py`` files that
``fsar export`` copies into ``<repository>/<model>/<version>/model.py``. Each is a thin shell in the
style of Triton's python_backend examples: ``initialize`` loads the checkpoint beside it
(:func:`training.triton_models.common.load_runner`), ``execute`` converts Triton tensors to numpy and
calls :class:`training.model.ModelRunner`, the same runner the embedded backend uses. The request
plumbing they share (merging a dynamic batch, the few-shot head's ops, error responses) is in
:mod:`training.triton_models.common`.
"""
