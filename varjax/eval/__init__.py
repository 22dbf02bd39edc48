"""Scoring generated images: class consistency and the distribution metric of the embedded data
(``consistency``, ``shape_metrics``), FID and its relatives (``fid`` math, ``inception`` features), and many
samples for FID over every device (``sample_many``)."""
