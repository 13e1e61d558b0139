# encoder ablation cell: a supervised ViT, weights frozen (the paper's default)
encoder = 'vit'
freeze_encoder = True
out_dir = 'out/vit_frozen'  # its image and finetune stages; text_out_dir (out/text) is shared
