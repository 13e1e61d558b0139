# encoder ablation cell: SigLIP, trained along with the LM at encoder_lr
encoder = 'siglip'
freeze_encoder = False
