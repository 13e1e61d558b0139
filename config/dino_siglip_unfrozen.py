# encoder ablation cell: DINO-SigLIP (DINOv2 and SigLIP features side by side), trained along with the LM at encoder_lr
encoder = 'dino_siglip'
projector = 'fused_mlp'  # Prismatic's projector for fused features
freeze_encoder = False
out_dir = 'out/dino_siglip_unfrozen'  # its image and finetune stages; text_out_dir (out/text) is shared
