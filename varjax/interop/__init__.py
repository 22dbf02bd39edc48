"""PyTorch interoperability without PyTorch: the restricted ``.pth`` reader and writer (``torch_io``), the
mapping between the release's state dicts and varjax's parameters (``convert``), and ``export``."""
