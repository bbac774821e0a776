"""Tiny random Hugging Face checkpoints that the tests save and load: sentence-transformers
folders shaped like LaBSE and XLM-R paraphrase models, and a wav2vec2 CTC folder.

Needs the `torch` extra; callers skip when it is missing.
"""

import json
import os

import torch
import transformers
import sentence_transformers
from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

try:
  from sentence_transformers.sentence_transformer.modules import (Dense, Normalize, Pooling,
                                                                  Transformer)
except ImportError:  # sentence-transformers < 6
  from sentence_transformers.models import Dense, Normalize, Pooling, Transformer


VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "E": 5, "T": 6, "A": 7, "O": 8,
         "N": 9, "'": 10, "H": 11}

_CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "Ça va très bien, merci! Naïve façade in Zürich.",
    "日本語のテキストです。这是中文。",
    "Emoji 😀 and 🚀 here.",
    "The quick brown fox jumps over the lazy dog.",
] * 20


def _wordpiece_tokenizer(max_length: int):
  """A cased WordPiece tokenizer like LaBSE's (no lowercasing, CJK split per character)."""
  tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False,
                                                    handle_chinese_chars=True)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  tokenizer.train_from_iterator(_CORPUS, trainers.WordPieceTrainer(vocab_size=200,
                                                                   special_tokens=specials))
  tokenizer.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tokenizer.decoder = decoders.WordPiece()
  return transformers.BertTokenizerFast(
      tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
      sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length)


def _sentencepiece_like_tokenizer(max_length: int):
  """A Unigram + Metaspace tokenizer with XLM-R's special ids (<s>=0, <pad>=1, </s>=2)."""
  tokenizer = Tokenizer(models.Unigram())
  tokenizer.normalizer = normalizers.NFKC()
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
  tokenizer.decoder = decoders.Metaspace()
  tokenizer.train_from_iterator(_CORPUS, trainers.UnigramTrainer(
      vocab_size=150, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
      unk_token="<unk>"))
  tokenizer.post_processor = processors.TemplateProcessing(
      single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
      special_tokens=[("<s>", 0), ("</s>", 2)])
  return transformers.XLMRobertaTokenizerFast(tokenizer_object=tokenizer,
                                              model_max_length=max_length)


def save_sentence_transformer(hf_dir, out_dir, head_modules, safe=True):
  model = sentence_transformers.SentenceTransformer(
      modules=[Transformer(str(hf_dir))] + head_modules, device="cpu")
  model.save(str(out_dir))
  if not safe:
    # Older releases saved pickled state dicts; transformers 5 writes only safetensors, so
    # convert each weights file the way torch.save would have written it.
    from safetensors.torch import load_file
    for folder, _, files in os.walk(out_dir):
      if "model.safetensors" in files:
        path = os.path.join(folder, "model.safetensors")
        torch.save(load_file(path), os.path.join(folder, "pytorch_model.bin"))
        os.remove(path)
  return str(out_dir)


def build_labse_like(root, safe=True):
  """BERT + CLS pooling + Dense(tanh) + Normalize, LaBSE's head on a 2-layer BERT."""
  torch.manual_seed(0)
  hf_dir = root / "hf"
  tokenizer = _wordpiece_tokenizer(max_length=24)
  config = transformers.BertConfig(
      vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=40, initializer_range=0.2)
  transformers.BertModel(config).save_pretrained(str(hf_dir))
  tokenizer.save_pretrained(str(hf_dir))
  head = [Pooling(32, pooling_mode="cls"), Dense(32, 16, activation_function=torch.nn.Tanh()),
          Normalize()]
  return save_sentence_transformer(hf_dir, root / "st", head, safe=safe)


def build_xlmr_like(root):
  """XLM-R (positions offset past the padding index, one token type) + mean + Normalize.

  max_position_embeddings = 32 leaves 30 usable positions, which is also the tokenizer's
  limit: truncated sentences reach the last row of the position table.
  """
  torch.manual_seed(1)
  hf_dir = root / "hf"
  tokenizer = _sentencepiece_like_tokenizer(max_length=30)
  config = transformers.XLMRobertaConfig(
      vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=32, type_vocab_size=1, pad_token_id=1,
      bos_token_id=0, eos_token_id=2, initializer_range=0.2)
  transformers.XLMRobertaModel(config).save_pretrained(str(hf_dir))
  tokenizer.save_pretrained(str(hf_dir))
  return save_sentence_transformer(hf_dir, root / "st", [Pooling(32, pooling_mode="mean"),
                                                          Normalize()])


def build_wav2vec2_ctc(folder):
  """A tiny wav2vec2-base-layout CTC checkpoint (group-norm extractor, post-LN) with its
  tokenizer and feature-extractor config, as a Hub folder would hold them."""
  config = transformers.Wav2Vec2Config(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
      conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=len(VOCAB),
      feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False)
  torch.manual_seed(0)
  model = transformers.Wav2Vec2ForCTC(config).eval()
  with torch.no_grad():  # A larger head spread makes the argmax robust to 1e-6 differences.
    model.lm_head.weight.mul_(20.0)
  model.save_pretrained(folder)
  (folder / "vocab.json").write_text(json.dumps(VOCAB))
  transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json")).save_pretrained(folder)
  feature_extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True,
                                                            return_attention_mask=False)
  feature_extractor.save_pretrained(folder)
  return model, feature_extractor, folder
