# the instrument's check recipe (docs/results.md): does the image-text stage teach vision? python train.py config/check.py
# Question-form captions at 10 % of the image stage's tokens (the paper's best range is 10-20 % images), an image stage
# long enough for the demo LM to start reading held-out names from them (12,000 steps: the probe curve in docs/results.md),
# and fine-tuning that rehearses the stage's mixture so it keeps what the captions grounded. About 80 min on 2 cores
caption_form = 'questions'
image_ratio = 0.1
image_ratio_of = 'tokens'
image_iters = 12000
ckpt_interval = 2000  # a periodic checkpoint about every 12 minutes: an interrupted stage resumes from it
keep_last = 6  # ... kept, so probe.py can read the stage's curve
finetune_rehearsal = True
finetune_epochs = 3  # where fine-tuning's gains end (docs/results.md, "Fine-tuning epochs": +0.004 vision from 3 to 4)
encoder_seed = 1  # one SigLIP for every seed: the check asks about the image stage, not the encoder's own luck
out_dir = 'out/check'
