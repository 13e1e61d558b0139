# python ablate.py config/ablate_image_ratio.py -- the share of image-caption data in the image stage's mixture.
# As a share of tokens, as the paper states its mixture (shares of the stage's data): a caption row is packed but
# not full, so a share of rows would understate it. The log prints the token shares each cell realised
recipe = 'config/check.py'  # every cell on the check's recipe: the one whose image-text stage teaches vision
grid = {'image_ratio': [0.0, 0.05, 0.1, 0.2, 0.5], 'image_ratio_of': ['tokens']}
baseline = 'image_ratio=0.1 image_ratio_of=tokens'  # the paper's best range is 10-20 %
# the paper: image-text data in pre-training is where vision comes from (10 % against none), and a large share costs
# text (50 % against 10 %)
primary = [('image_ratio=0.1 image_ratio_of=tokens', 'image_ratio=0.0 image_ratio_of=tokens', 'vision'),
           ('image_ratio=0.5 image_ratio_of=tokens', 'image_ratio=0.1 image_ratio_of=tokens', 'text')]
out_dir = 'out/ablate_image_ratio'  # its results; its runs too, unless runs_dir names a folder plans share
