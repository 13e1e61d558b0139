# encoder ablation cell: a ResNet, weights frozen (the paper's default)
encoder = 'resnet'
freeze_encoder = True
