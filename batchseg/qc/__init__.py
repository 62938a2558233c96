"""Data cleaning from stored embeddings: outlier detectors and near-duplicate search.

``rglasso`` (Robust Graphical Lasso, our ADMM), ``mogaal`` (MO-GAAL in torch), ``mcd``
(scikit-learn's MinCovDet baseline) score images in a reduced space (``reduction``);
``duplicates`` finds near-copies exactly by blocked cosine similarity; ``model`` is the
small fitted-model file that lets a rerun score new images incrementally; ``flags`` is
what later stages call to leave flagged images out.
"""
