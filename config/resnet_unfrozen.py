# encoder ablation cell: a ResNet, trained along with the LM at encoder_lr
encoder = 'resnet'
freeze_encoder = False
