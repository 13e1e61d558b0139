# The paper's 79M model (Table 2): 8 layers, 4 heads, d_model 512, peak LR 3e-3, 400 warmup steps, batch 512 x 2048,
# with the paper's encoders at 384 px. Combine with an encoder config and real data (see README, "Reproducing"):
#   torchrun --standalone --nproc_per_node=8 train.py config/scale_79m.py config/dino_siglip_unfrozen.py
model = '79m'
block_size = 2048
batch_size = 512
gradient_accumulation_steps = 8  # per rank with 8 GPUs: 512 / (8 ranks x 8) = 8 sequences per micro-step
learning_rate = 3e-3
min_lr = 3e-5
warmup_iters = 400
encoder_scale = 'paper'
encoder_weights = 'hub'
scene_size = 384
