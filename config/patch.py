# encoder ablation cell: no pretrained encoder at all, only a learned linear patch embedding (trained with the LM)
encoder = 'patch'
freeze_encoder = False
out_dir = 'out/patch'  # its image and finetune stages; text_out_dir (out/text) is shared
