# encoder ablation cell: a supervised ViT, trained along with the LM at encoder_lr
encoder = 'vit'
freeze_encoder = False
