# encoder ablation cell: a ResNet, weights frozen (the paper's default)
encoder = 'resnet'
freeze_encoder = True
out_dir = 'out/resnet_frozen'  # its image and finetune stages; text_out_dir (out/text) is shared
