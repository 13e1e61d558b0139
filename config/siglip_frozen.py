# encoder ablation cell: SigLIP, weights frozen (the paper's default)
encoder = 'siglip'
freeze_encoder = True
out_dir = 'out/siglip_frozen'  # its image and finetune stages; text_out_dir (out/text) is shared
