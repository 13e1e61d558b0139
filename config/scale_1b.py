# The paper's 1.4B model (Table 2): 24 layers, 16 heads, d_model 2048, peak LR 1e-2, 5000 warmup steps,
# batch 256 x 2048, with the paper's encoders at 384 px. Combine with an encoder config and real data:
#   torchrun --nnodes=2 --nproc_per_node=8 ... train.py config/scale_1b.py config/siglip_frozen.py
model = '1b'
block_size = 2048
batch_size = 256
gradient_accumulation_steps = 8  # per rank with 8 GPUs: 256 / (8 ranks x 8) = 4 sequences per micro-step
learning_rate = 1e-2
min_lr = 1e-4
warmup_iters = 5000
encoder_scale = 'paper'
encoder_weights = 'hub'
scene_size = 384
