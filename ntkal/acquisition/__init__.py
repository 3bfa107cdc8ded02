"""Acquisition: candidates (the scan's records), scorers (what ranks the pool), selectors (how B are
picked), and the pipeline that runs them for every entry point."""
