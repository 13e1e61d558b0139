# encoder ablation cell: SigLIP, weights frozen (the paper's default)
encoder = 'siglip'
freeze_encoder = True
