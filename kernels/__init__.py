# Triton kernels, each file beside its plain-torch reference.
#
# Keep this file free of imports and of `__version__`: Hugging Face ships a
# package also named `kernels`, which transformers probes for. With this
# project pip-installed, the probe finds us; an import side effect or a
# version attribute here would make transformers take us for theirs.
