# encoder ablation cell: a ResNet, trained along with the LM at encoder_lr
encoder = 'resnet'
freeze_encoder = False
out_dir = 'out/resnet_unfrozen'  # its image and finetune stages; text_out_dir (out/text) is shared
