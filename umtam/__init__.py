"""umtam: optimizer statistics as a reusable asset for pruning and merging."""

__version__ = "0.1.0"
