"""The processor's pixel normalisation constants, one copy for the host and the device.

Qwen2-VL's image processor (transformers 4.57.6) maps a uint8 value v of channel c to
``(v / 255 - IMAGE_MEAN[c]) / IMAGE_STD[c]`` (OpenAI CLIP statistics). data/media.py does it on the host for
the public `preprocess_images` / `preprocess_video` output; the packed training batch instead carries the raw
uint8 patch values (a quarter of the bytes host -> device) and vision_tower normalises them on the device.
A patch row's 1176 columns are channel-major (channel, frame, 14, 14): column j has channel j // 392.
No jax here: data/media.py imports these without pulling in the model.
"""
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255
