# python ablate.py config/ablate_finetune_epochs.py -- epochs of instruction fine-tuning
grid = {'finetune_epochs': [1, 2, 4]}
baseline = 'finetune_epochs=2'
