"""`ntkal experiment`: active-learning study harness (select -> label -> fine-tune -> evaluate, per round).

Modules: config (YAML settings), datasets (splits), finetune (mace_run_train --foundation_model),
metrics (errors and predictions), features (one pretrained model's cached feature rows),
committee (the 4-member baseline), acquisition (every method's picks), runner (rounds x methods x
seeds, resumable), report (docs/results.md tables and plots).
"""
