# python ablate.py config/ablate_encoder_lr.py -- frozen versus trained as a curve, not one point: every encoder
# frozen, and trained at three peak encoder LRs spanning 1e-5 to 1e-3 (its own warmup and cosine:
# train.encoder_schedule). A single encoder_lr would let the freeze answer hinge on one number
recipe = 'config/check.py'  # every cell on the check's recipe: the one whose image-text stage teaches vision
grid = [{'config': ['config/siglip_frozen.py', 'config/dino_siglip_frozen.py', 'config/vit_frozen.py',
                    'config/resnet_frozen.py']},
        {'config': ['config/siglip_unfrozen.py', 'config/dino_siglip_unfrozen.py', 'config/vit_unfrozen.py',
                    'config/resnet_unfrozen.py'], 'encoder_lr': [1e-5, 1e-4, 1e-3]}]
baseline = 'siglip_frozen'
# the paper's Table 4: a trained encoder beats a frozen one (VQAv2 at 80 %); Prismatic found the opposite. Each
# family at 1e-4, the highest LR that leaves its pre-training intact, against its own frozen encoder
primary = [(f'{e}_unfrozen encoder_lr=0.0001', f'{e}_frozen', 'vision') for e in ('siglip', 'dino_siglip', 'vit', 'resnet')]
out_dir = 'out/ablate_encoder_lr'  # its results; its runs too, unless runs_dir names a folder plans share
