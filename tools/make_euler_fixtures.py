"""Fixtures of diffusers' Euler schedulers (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)
made with `Class.from_config` of the Kandinsky hub scheduler files, as `--scheduler euler|euler-a`
builds them: timesteps, sigmas, init_noise_sigma, a whole 10-step loop on a fixed stand-in model
(eps = 0.5 * scaled input + 0.1), and add_noise.

Pinned: torch 2.15.0, diffusers 0.42.1. Writes fixtures/schedulers/euler.safetensors (deterministic).
Run: python tools/make_euler_fixtures.py
"""
import os

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler)
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
COMMON = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
              thresholding=False)
CASES = {
    # name: (class, base class, extra keys of the base file)
    "euler_from_ddim_2_1": (EulerDiscreteScheduler, DDIMScheduler, {}),
    "euler_a_from_ddpm_2_2": (EulerAncestralDiscreteScheduler, DDPMScheduler, {}),
    "euler_leading": (EulerDiscreteScheduler, DDIMScheduler, {"timestep_spacing": "leading"}),
    "euler_a_trailing": (EulerAncestralDiscreteScheduler, DDPMScheduler, {"timestep_spacing": "trailing"}),
    # Decoders that predict the clean latents or the velocity (diffusers' Euler ancestral refuses
    # "sample").
    "euler_sample": (EulerDiscreteScheduler, DDIMScheduler, {"prediction_type": "sample"}),
    "euler_vpred": (EulerDiscreteScheduler, DDIMScheduler, {"prediction_type": "v_prediction"}),
    "euler_a_vpred": (EulerAncestralDiscreteScheduler, DDPMScheduler, {"prediction_type": "v_prediction"}),
}


def base_config(base, extra):
    # The hub file's keys only, as a loaded scheduler_config.json: the rest take the Euler
    # class's defaults.
    return {"_class_name": base.__name__, **COMMON, **extra}


def main():
    out = {}
    for name, (cls, base, extra) in CASES.items():
        cfg = base_config(base, extra)
        for n in (10, 25):
            s = cls.from_config(cfg)
            s.set_timesteps(n)
            out[f"{name}.timesteps_{n}"] = s.timesteps.clone().float()
            out[f"{name}.sigmas_{n}"] = s.sigmas.clone().float()
            out[f"{name}.init_noise_sigma_{n}"] = torch.tensor([float(s.init_noise_sigma)])
        s = cls.from_config(cfg)
        s.set_timesteps(10)
        x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
        g = torch.Generator().manual_seed(1)
        for i, t in enumerate(s.timesteps):
            inp = s.scale_model_input(x, t)
            if i in (0, 5):
                out[f"{name}.input_{i}"] = inp.clone()
            eps = 0.5 * inp + 0.1
            x = s.step(eps, t, x, generator=g).prev_sample
            if i == 0:
                out[f"{name}.after_0"] = x.clone()
        out[f"{name}.final"] = x.clone()
        s = cls.from_config(cfg)
        s.set_timesteps(10)
        x0 = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
        noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
        out[f"{name}.x0"] = x0
        out[f"{name}.noise"] = noise
        out[f"{name}.noised_3"] = s.add_noise(x0, noise, s.timesteps[3:4])
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(ROOT, "schedulers", "euler.safetensors"))


if __name__ == "__main__":
    main()
