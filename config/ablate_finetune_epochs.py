# python ablate.py config/ablate_finetune_epochs.py -- epochs of instruction fine-tuning (the paper: 2-4 are best)
grid = {'finetune_epochs': [2, 4, 6, 9]}
baseline = 'finetune_epochs=6'  # train.py's default recipe: with a shared runs_dir, the siglip_frozen run itself
primary = [('finetune_epochs=6', 'finetune_epochs=2', 'vision')]  # the shapes world pilot: 6 epochs beat 3
out_dir = 'out/ablate_finetune_epochs'  # its results; its runs too, unless runs_dir names a folder plans share
