"""The shop's catalogue: a dozen products, priced in fen, named in both languages."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Product:
    id: str
    name_en: str
    name_zh: str
    blurb_en: str
    blurb_zh: str
    price: int  # fen

    def name(self, lang: str) -> str:
        return self.name_zh if lang == "zh" else self.name_en

    def blurb(self, lang: str) -> str:
        return self.blurb_zh if lang == "zh" else self.blurb_en

    @property
    def image(self) -> str:
        return f"img/{self.id}.svg"


PRODUCTS: tuple[Product, ...] = (
    Product("tea", "Green tea", "绿茶", "Longjing, 50 g tin", "龙井，50 克罐装", 3800),
    Product(
        "dumplings",
        "Dumplings",
        "饺子",
        "Frozen, pork and cabbage, 20 pieces",
        "猪肉白菜速冻水饺，20 个",
        1850,
    ),
    Product(
        "umbrella", "Umbrella", "雨伞", "Folding, keeps the drizzle off", "折叠伞，挡住毛毛雨", 4500
    ),
    Product("notebook", "Notebook", "笔记本", "A5, dotted, 120 pages", "A5 点阵，120 页", 1250),
    Product("mug", "Mug", "马克杯", "Ceramic, 350 ml", "陶瓷，350 毫升", 2900),
    Product("bun", "Steamed bun", "包子", "Fresh this morning", "今早新鲜出笼", 350),
    Product("lantern", "Paper lantern", "灯笼", "Red, for the festival", "红灯笼，节日用", 6600),
    Product("chopsticks", "Chopsticks", "筷子", "Bamboo, five pairs", "竹筷，五双", 990),
    Product("orange", "Mandarin oranges", "橘子", "One kilogram", "一公斤", 1580),
    Product("kite", "Kite", "风筝", "Swallow kite with line", "燕子风筝，带线", 8800),
    Product("fan", "Hand fan", "扇子", "Folding, painted silk", "折扇，绢面彩绘", 2450),
    Product("bike_bell", "Bicycle bell", "自行车铃", "Loud and cheerful", "响亮又欢快", 1200),
)

BY_ID: dict[str, Product] = {product.id: product for product in PRODUCTS}

TOPUP_AMOUNTS: tuple[int, ...] = (2000, 5000, 10000, 20000)
