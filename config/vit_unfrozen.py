# encoder ablation cell: a supervised ViT, trained along with the LM at encoder_lr
encoder = 'vit'
freeze_encoder = False
out_dir = 'out/vit_unfrozen'  # its image and finetune stages; text_out_dir (out/text) is shared
