"""Evaluation: NYU metrics and constants (``metrics``), the references' test-time augmentation (``tta``).

Submodules are imported explicitly (``from vpd_jax.evaluation import metrics``) so that importing the
package stays free of jax work.
"""
