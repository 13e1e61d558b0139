# python ablate.py config/ablate_instruct.py -- instruction conversations mixed into the image stage, or not
recipe = 'config/check.py'  # every cell on the check's recipe: the one whose image-text stage teaches vision
grid = {'instruct_ratio': [0.0, 0.1]}
baseline = 'instruct_ratio=0.0'
primary = [('instruct_ratio=0.1', 'instruct_ratio=0.0', 'vision')]  # the paper: instruction data in pre-training hurts
out_dir = 'out/ablate_instruct'  # its results; its runs too, unless runs_dir names a folder plans share
