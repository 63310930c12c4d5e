"""Simplified Chinese and English: choosing the language, the strings, money as ¥12.50."""

from __future__ import annotations

from collections.abc import Callable

LANGUAGES: tuple[str, ...] = ("en", "zh")
DEFAULT_LANGUAGE = "en"
COOKIE = "wp_lang"


def format_fen(amount: int) -> str:
    """¥12.50 for 1250 fen; negative amounts as -¥12.50. Integer arithmetic only."""
    sign = "-" if amount < 0 else ""
    amount = abs(amount)
    return f"{sign}¥{amount // 100:,}.{amount % 100:02d}"


def choose_language(query: str | None, cookie: str | None, accept_language: str | None) -> str:
    """``?lang=`` wins, then the cookie, then the best match of Accept-Language."""
    for explicit in (query, cookie):
        if explicit in LANGUAGES:
            return explicit
    best, best_q = DEFAULT_LANGUAGE, -1.0
    for position, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip().lower()
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        primary = tag.split("-")[0]
        if primary in LANGUAGES and q > best_q and q > 0:
            best, best_q = primary, q - position * 1e-6
    return best


STRINGS: dict[str, tuple[str, str]] = {
    "shop_name": ("Purse & Co. corner shop", "钱包小铺"),
    "tagline": (
        "Pay with the e-purse on your card, on the reader beside you.",
        "用手边读卡器上的电子钱包卡付款。",
    ),
    "catalogue": ("Shop", "商品"),
    "cart": ("Cart", "购物车"),
    "orders": ("Orders", "订单"),
    "topup": ("Top up card", "卡充值"),
    "add_to_cart": ("Add to cart", "加入购物车"),
    "cart_empty": ("Your cart is empty.", "购物车是空的。"),
    "quantity": ("Qty", "数量"),
    "remove": ("Remove", "移除"),
    "total": ("Total", "合计"),
    "checkout": ("Check out and pay", "结账付款"),
    "continue_shopping": ("Continue shopping", "继续购物"),
    "pay_title": ("Pay with your card", "用卡付款"),
    "order": ("Order", "订单"),
    "amount": ("Amount", "金额"),
    "step_connect": ("Connect your reader", "连接读卡器"),
    "step_present": ("Present your card", "请放卡"),
    "step_confirm": ("Confirm on your device", "请在设备上确认"),
    "step_done": ("Paid", "已付款"),
    "connect_help": (
        "Your webpurse agent is asked to connect automatically. "
        "If it does not, type this code into the agent:",
        "正在请求本机 webpurse 代理自动连接。如未连接，请在代理中输入此代码：",
    ),
    "connect_retry": ("Connect reader", "连接读卡器"),
    "agent_unreachable": (
        "No agent answered on this device. Start it with: webpurse agent",
        "本机没有代理响应。请运行：webpurse agent",
    ),
    "phase_waiting_reader": ("Waiting for your reader…", "等待读卡器连接…"),
    "phase_present_card": ("Present your card to the reader.", "请把卡放在读卡器上。"),
    "phase_reading": ("Reading your card…", "正在读卡…"),
    "phase_authorising": ("Checking with the bank…", "正在向结算中心核验…"),
    "phase_recovering": (
        "Finishing an earlier interrupted transaction…",
        "正在完成之前中断的交易…",
    ),
    "phase_confirm": ("Confirm the amount on your device.", "请在设备上确认金额。"),
    "phase_capturing": ("Completing…", "正在完成…"),
    "phase_succeeded": ("Paid. Thank you!", "付款成功，谢谢！"),
    "phase_loaded": ("Loaded. Your new balance is on the card.", "充值成功，余额已写入卡中。"),
    "phase_declined": ("Declined", "已拒绝"),
    "phase_interrupted": (
        "Interrupted: present the card again.",
        "交易中断：请再次放卡。",
    ),
    "phase_failed": ("Something went wrong", "出现错误"),
    "decline_no_reader": (
        "no reader connected in time: reload the page to try again",
        "读卡器未及时连接：请刷新页面重试",
    ),
    "decline_consent_refused": ("you declined on your device", "您在设备上拒绝了付款"),
    "decline_amount_mismatch": (
        "the amount on your device did not match",
        "设备上的金额不一致",
    ),
    "decline_already_done": (
        "your agent ended the session after an interruption: try again",
        "中断后代理已结束会话：请重试",
    ),
    "status_pending": ("Awaiting payment", "待付款"),
    "status_paid": ("Paid", "已付款"),
    "status_loaded": ("Loaded", "已充值"),
    "status_declined": ("Declined", "已拒绝"),
    "status_interrupted": ("Interrupted", "已中断"),
    "status_canceled": ("Canceled", "已取消"),
    "decline_insufficient_funds": ("insufficient funds on the card", "卡内余额不足"),
    "decline_balance_limit": ("the card would exceed its maximum balance", "超过卡的最高余额"),
    "decline_card_blocked": ("the card is blocked", "卡已锁定"),
    "decline_card_expired": ("the card has expired", "卡已过期"),
    "decline_unknown_card": ("the card is not known to the issuer", "发卡方不认识此卡"),
    "decline_card_lost": ("the card was reported lost", "卡已挂失"),
    "decline_not_an_epurse": ("this card has no e-purse", "此卡没有电子钱包"),
    "decline_other": ("the card or the issuer refused", "卡或发卡方拒绝了交易"),
    "try_again": ("Try again", "重试"),
    "back_to_shop": ("Back to the shop", "返回商店"),
    "no_orders": ("No orders yet.", "还没有订单。"),
    "card": ("Card", "卡号"),
    "balance_after": ("Balance after", "交易后余额"),
    "balance_before": ("Balance before", "交易前余额"),
    "tac": ("TAC", "TAC"),
    "payment": ("Payment", "支付单"),
    "topup_title": ("Top up your card", "为卡充值"),
    "topup_help": (
        "Choose an amount; the value is loaded onto your card through your reader.",
        "选择金额，金额将通过读卡器写入您的卡。",
    ),
    "topup_go": ("Top up", "充值"),
    "kind_purchase": ("Purchase", "购物"),
    "kind_topup": ("Top-up", "充值"),
    "date": ("Date", "日期"),
    "status": ("Status", "状态"),
    "language": ("中文", "English"),
    "trust_note": (
        "Your agent shows the amount it reads from the card; pay only if it matches.",
        "代理显示从卡中读取的金额；金额一致时才确认付款。",
    ),
}


def translator(lang: str) -> Callable[[str], str]:
    index = 1 if lang == "zh" else 0

    def t(key: str) -> str:
        pair = STRINGS.get(key)
        return pair[index] if pair else key

    return t


def decline_text(lang: str, code: str | None) -> str:
    t = translator(lang)
    key = f"decline_{code}"
    return t(key) if key in STRINGS else t("decline_other") + (f" ({code})" if code else "")


def decline_texts(lang: str) -> dict[str, str]:
    """Every decline reason's text (for the payment page's script), plus ``other``."""
    texts = {
        key.removeprefix("decline_"): translator(lang)(key)
        for key in STRINGS
        if key.startswith("decline_")
    }
    return texts
