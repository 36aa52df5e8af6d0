"""flyfn's benchmarks: `python -m benchmarks` (`make bench`) measures flyfn beside the blog's.

Areas: middleware (in-process cost), blog_baseline (Machines API use against the blog's middleware),
e2e (through `flyfn dev` on loopback) and receipts (the demo's reportlab PDFs).
"""

from __future__ import annotations
