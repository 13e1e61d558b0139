# python ablate.py config/ablate_injection.py -- the paper's image injection point: images enter the text-only
# run's checkpoint at 20 % ... 100 % of its steps (1.0 re-warms the LR; below it continues the text schedule), or
# from scratch (0: a new LM on the image-text mixture, with the text stage's warmup and peak LR)
recipe = 'config/check.py'  # every cell on the check's recipe: the one whose image-text stage teaches vision
grid = {'image_inject_frac': [0, 0.2, 0.4, 0.6, 0.8, 1.0]}
baseline = 'image_inject_frac=1.0'  # the usual recipe: a fully trained LM, then images
# the paper: images injected at 80 % of text pre-training beat a fully trained LM, and from scratch hurts both scores
primary = [('image_inject_frac=0.8', 'image_inject_frac=1.0', 'vision'),
           ('image_inject_frac=0.8', 'image_inject_frac=0', 'vision'), ('image_inject_frac=0.8', 'image_inject_frac=0', 'text')]
out_dir = 'out/ablate_injection'  # its results; its runs too, unless runs_dir names a folder plans share
