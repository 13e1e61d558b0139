# python ablate.py config/ablate_instruct.py -- instruction conversations mixed into the image stage, or not
cells = [dict(instruct_ratio=r) for r in (0.0, 0.1)]
baseline = 'instruct_ratio=0.0'
