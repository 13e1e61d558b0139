# python ablate.py config/ablate_no_encoder.py -- no image encoder at all (a linear patch embedding trained with the LM)
# against the tiny SigLIP, frozen, on the check's recipe (config/check.py: the one whose image-text stage teaches
# vision), each after 1 and 3 epochs of fine-tuning. The SigLIP cells are the check's captions cells (the same
# resolved config): with the check's runs_dir they are those runs. About 1h20m a seed on 2 cores (one image stage)
recipe = 'config/check.py'
grid = {'config': ['config/siglip_frozen.py', 'config/patch.py'], 'finetune_epochs': [1, 3]}
baseline = 'siglip_frozen finetune_epochs=1'
# the paper: a pre-trained encoder is worth much over none (its SigLIP and DINO-SigLIP against a patch embedding)
primary = [('siglip_frozen finetune_epochs=1', 'patch finetune_epochs=1', 'vision'),
           ('siglip_frozen finetune_epochs=3', 'patch finetune_epochs=3', 'vision')]
seeds = [1, 2, 3]
out_dir = 'out/ablate_no_encoder'  # its results; its runs too, unless runs_dir names a folder plans share
