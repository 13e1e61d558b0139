# python ablate.py config/ablate_finetune_epochs.py -- epochs of instruction fine-tuning
cells = [dict(finetune_epochs=n) for n in (1, 2, 4)]
baseline = 'finetune_epochs=2'
