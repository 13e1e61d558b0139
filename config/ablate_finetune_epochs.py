# python ablate.py config/ablate_finetune_epochs.py -- epochs of instruction fine-tuning (the paper: 2-4 are best), on
# the check's recipe (config/check.py). The cells of a seed share its image stage, so each runs only fine-tuning and
# scoring; 1 and 3 epochs are the check's captions cells. About 22 minutes a seed on 2 cores once that stage exists
recipe = 'config/check.py'
grid = {'finetune_epochs': [1, 2, 3, 4, 6]}
baseline = 'finetune_epochs=3'  # inside the paper's range, and the check's 3-epoch cell
# the paper: 2-4 epochs are best. Here: do 3 beat 1, and do epochs beyond the paper's range add vision or cost text?
primary = [('finetune_epochs=3', 'finetune_epochs=1', 'vision'), ('finetune_epochs=6', 'finetune_epochs=3', 'vision'),
           ('finetune_epochs=6', 'finetune_epochs=3', 'text')]
seeds = [1, 2, 3]
out_dir = 'out/ablate_finetune_epochs'  # its results; its runs too, unless runs_dir names a folder plans share
