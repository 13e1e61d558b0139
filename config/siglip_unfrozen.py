# encoder ablation cell: SigLIP, trained along with the LM at encoder_lr
encoder = 'siglip'
freeze_encoder = False
out_dir = 'out/siglip_unfrozen'  # its image and finetune stages; text_out_dir (out/text) is shared
