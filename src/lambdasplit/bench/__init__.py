"""Benchmarks: emulated links (links.py, delayline.py), traffic counted outside the program (capture.py),
the paper's Table I measured (llm.py) and its reports (report.py). ``lambdasplit bench llm`` drives them.
The planner (``lambdasplit plan``): its cost model (plan.py), measured inputs (profile.py), the audit's recorded
recovery (recovery.py), tied together in planner.py."""

from lambdasplit.bench.links import LINKS, Link, open_link, parse_link
from lambdasplit.bench.llm import TableConfig, TableResult, run_table

__all__ = ["LINKS", "Link", "TableConfig", "TableResult", "open_link", "parse_link", "run_table"]
