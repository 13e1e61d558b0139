# encoder ablation cell: DINO-SigLIP (DINOv2 and SigLIP features side by side), weights frozen (the paper's default)
encoder = 'dino_siglip'
projector = 'fused_mlp'  # Prismatic's projector for fused features
freeze_encoder = True
out_dir = 'out/dino_siglip_frozen'  # its image and finetune stages; text_out_dir (out/text) is shared
