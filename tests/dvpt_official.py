# ruff: noqa
# fmt: off
"""The official DVPT ViT modules, verbatim, for the parity test in test_dvpt.py (run from source, no network).

Excerpt of ``code/model.py`` (lines 1-8 and 170-296: the imports, ``LayerNorm``, ``QuickGELU``, ``share_MLP``,
``ResidualAttentionBlock``, ``Transformer`` and ``VisionTransformer``, the CLIP visual tower the official DVPT
classifier trains) from github.com/NKUhealong/DVPT at commit 180a4a45145622bc5b9d25ea02b8560f39263494,
unchanged. The official classifier (``code/models.py`` ``ViT_Model``) is ``fc_head(VisionTransformer(x))`` with
``fc_head = nn.Linear(output_dim, num_classes, bias=False)``.

MIT License

Copyright (c) 2023 Along He

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""

from collections import OrderedDict
from typing import Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

class LayerNorm(nn.LayerNorm):
    """Subclass torch's LayerNorm to handle fp16."""

    def forward(self, x: torch.Tensor):
        orig_type = x.dtype
        ret = super().forward(x.type(torch.float32))
        return ret.type(orig_type)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor):
        return x * torch.sigmoid(1.702 * x)

class share_MLP(nn.Module):
    def __init__(self,d_model):
        super().__init__()
        self.latent_dim =20
        self.prompt_key_proj_d = nn.Linear(d_model, self.latent_dim)
        self.prompt_key_proj_u = nn.Linear(self.latent_dim, d_model)

        self.prompt_gate = torch.nn.Parameter(torch.zeros(1))
        self.gellu = QuickGELU()

    def forward(self, x):
        x = self.prompt_key_proj_u(self.gellu(self.prompt_key_proj_d(x)))*self.prompt_gate 
        return x

class ResidualAttentionBlock(nn.Module):
    def __init__(self, proj, d_model: int, n_head: int, attn_mask: torch.Tensor = None):
        super().__init__()

        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, d_model * 4)),("gelu", QuickGELU()),("c_proj", nn.Linear(d_model * 4, d_model))]))
        self.ln_2 = LayerNorm(d_model)
        self.attn_mask = attn_mask
        self.prompt_proj = proj
        self.softmax = nn.Softmax(dim=-1)
        self.num = 50
        self.scale = d_model ** -0.5
        
    def attention(self, x: torch.Tensor):
        self.attn_mask = self.attn_mask.to(dtype=x.dtype, device=x.device) if self.attn_mask is not None else None
        return self.attn(x, x, x, need_weights=False, attn_mask=self.attn_mask)[0]

    def forward(self, x: torch.Tensor):
        x = x + self.attention(self.ln_1(x))
        
        ##############
        x = x.permute(1, 0, 2)
        prompt = x[:,0:self.num,:]
        tokens = x[:,self.num:,:]
        prompt_attn = (prompt@ tokens.transpose(-2, -1)* self.scale)
        prompt_attn = self.softmax(prompt_attn)
        prompt_out = (prompt_attn @ tokens)
        prompt_out = torch.cat([prompt_out,tokens], dim=1)
        #############
        x = x + self.mlp(self.ln_2(x)) +  self.prompt_proj(x) 
        x = x.permute(1, 0, 2)
        return x

class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor = None):
        super().__init__()
        self.width = width
        self.layers = layers 
        resblocks = []
        for i in range(layers):
            if i % 3 ==0:
                share_mlp1 = share_MLP(width)
            
            resblocks.append(ResidualAttentionBlock(share_mlp1,width, heads, attn_mask))
        self.resblocks = nn.Sequential(*resblocks)

    def forward(self, x: torch.Tensor):
        return self.resblocks(x)

class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(in_channels=3, out_channels=width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        
        #################
        
        self.num = 50
        self.prompt_positional_embedding = nn.Parameter(scale * torch.randn(self.num, width))
        self.prompt_token = nn.Parameter(torch.randn(1,self.num, width))
        
        #################

    def forward(self, x: torch.Tensor):
        x = self.conv1(x)  # shape = [*, width, grid, grid]
        x = x.reshape(x.shape[0], x.shape[1], -1)  # shape = [*, width, grid ** 2]
        x = x.permute(0, 2, 1)  # shape = [*, grid ** 2, width]
        x = torch.cat([self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device), x], dim=1)  # shape = [*, grid ** 2 + 1, width]
        
        #########******########
        x =  torch.cat([self.prompt_token + torch.zeros(x.shape[0], self.num, x.shape[-1], dtype=x.dtype, device=x.device),x], dim=1) 
        #################
        
        x = x + torch.cat([self.prompt_positional_embedding.to(x.dtype), self.positional_embedding.to(x.dtype)], dim=0)
        #x = x + self.positional_embedding.to(x.dtype)
        
        x = self.ln_pre(x)

        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD

        #x = self.ln_post(x[:, 0, :])
        x = self.ln_post(x[:, 0:self.num+1, :])
        x = torch.mean(x, dim = 1)

        if self.proj is not None:
            x = x @ self.proj
        #print(x.shape)
        return x

