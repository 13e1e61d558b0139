# python ablate.py config/ablate_check.py -- the instrument's check: captions at 10 % of the image stage's tokens
# against none (the same stage on text alone), each after 1 and 3 epochs of fine-tuning (config/check.py's recipe;
# the two fine-tunings of a ratio share its image stage). About 2h46m a seed on 2 cores
grid = {'config': ['config/check.py'], 'image_ratio': [0.1, 0.0], 'finetune_epochs': [1, 3]}
baseline = 'check image_ratio=0.1 finetune_epochs=1'
# the paper: the image-text stage is where vision comes from; the target is +0.15 vision at 10 % against none
primary = [('check image_ratio=0.1 finetune_epochs=1', 'check image_ratio=0.0 finetune_epochs=1', 'vision'),
           ('check image_ratio=0.1 finetune_epochs=3', 'check image_ratio=0.0 finetune_epochs=3', 'vision')]
seeds = [1, 2, 3]
out_dir = 'out/ablate_check'  # its results; its runs too, unless runs_dir names a folder plans share
