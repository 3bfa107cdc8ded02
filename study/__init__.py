"""The active-learning study of ntkal (`python -m study` from the repository root): select -> label ->
fine-tune -> evaluate, per round, for every method, dataset and seed of a config; not part of the package.

Modules: config (YAML settings), methods (method names), datasets (splits), finetune (mace_run_train
--foundation_model), metrics (errors), features (the pretrained model's cached rows), committee (the
baseline), acquisition (every method's picks), runner (cells x methods x rounds, resumable), curves
(fine-tune calibration), records / claims / report (docs/results.md and the config's claims judged),
stats / fmt (intervals and their text); data/ (the generators of ntkal/data's files).
"""
