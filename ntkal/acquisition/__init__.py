"""Acquisition: streams (inputs in checked chunks), centres (LCMD's labelled ψ), candidates (the scan's
records and their checkpoint state), scorers and target (what ranks the pool), residuals, selectors (how B are
picked), and the pipeline that runs them for every entry point. Imports point down: posterior, features, io,
runstate; nothing there imports acquisition."""
