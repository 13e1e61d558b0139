# python ablate.py config/ablate_image_ratio.py -- the share of image-caption sequences in the image stage's mixture
grid = {'image_ratio': [0.0, 0.05, 0.1, 0.2, 0.5]}
baseline = 'image_ratio=0.1'  # the paper's best
