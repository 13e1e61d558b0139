# python ablate.py config/ablate_check_20.py -- the check at the top of the paper's best range: captions at 20 % of
# the image stage's tokens in half its steps (6,000: about the captions 10 % gives in 12,000), against none in the
# same 6,000 steps, each after 1 and 3 epochs of fine-tuning (config/check.py's recipe otherwise). About 1h26m a seed
# on 2 cores, half the check's: if it passes, a plan on this recipe costs half as much
grid = {'config': ['config/check.py'], 'image_ratio': [0.2, 0.0], 'finetune_epochs': [1, 3], 'image_iters': [6000]}
baseline = 'check image_ratio=0.2 finetune_epochs=1 image_iters=6000'
primary = [('check image_ratio=0.2 finetune_epochs=1 image_iters=6000',
            'check image_ratio=0.0 finetune_epochs=1 image_iters=6000', 'vision'),
           ('check image_ratio=0.2 finetune_epochs=3 image_iters=6000',
            'check image_ratio=0.0 finetune_epochs=3 image_iters=6000', 'vision')]
seeds = [1, 2, 3]
out_dir = 'out/ablate_check_20'  # its results; its runs too, unless runs_dir names a folder plans share
