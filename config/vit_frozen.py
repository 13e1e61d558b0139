# encoder ablation cell: a supervised ViT, weights frozen (the paper's default)
encoder = 'vit'
freeze_encoder = True
