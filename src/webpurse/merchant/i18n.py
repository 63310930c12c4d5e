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
    "decline_wrong_card": (
        "this top-up is bound to another card: present the card it was ordered for",
        "此充值绑定了另一张卡：请放置下单时的卡",
    ),
    "decline_awaiting_funds": ("the bank transfer has not arrived yet", "银行转账尚未到账"),
    "decline_insufficient_float": (
        "the shop's top-up float is too low",
        "商店充值备付金不足",
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
        "Value goes onto your card only once you have paid for it: by bank transfer from "
        "your own account, or in cash at our counter.",
        "只有在您付款之后，金额才会写入您的卡：从您自己的账户银行转账，或在柜台付现金。",
    ),
    "topup_method": ("How will you pay?", "付款方式"),
    "method_bank_transfer": ("Bank transfer", "银行转账"),
    "method_cash": ("Cash at the till", "柜台现金"),
    "bank_transfer_help": (
        "Choose the amount and the card. You get a payment reference: transfer the amount "
        "with it from your bank. When the money has arrived, present the card here to load it.",
        "选择金额和卡。您会得到一个付款参考号：请用它从银行转账。款项到账后，在此放卡即可充值。",
    ),
    "card_number_label": (
        "Card number (the 20 characters printed on the card)",
        "卡号（卡面上印的 20 位字符）",
    ),
    "read_card": ("Read it from my card (reader)", "从卡上读取（读卡器）"),
    "read_card_waiting": (
        "Present your card to the reader beside you…",
        "请把卡放在手边的读卡器上…",
    ),
    "read_card_done": ("Card number read from the card.", "已从卡上读取卡号。"),
    "read_card_failed": (
        "The card could not be read: type the number printed on it.",
        "无法读取卡：请输入卡面上印的卡号。",
    ),
    "topup_order_transfer": ("Get the payment reference", "获取付款参考号"),
    "cash_help": (
        "Come to our counter and pay in cash: the staff take the money and load it onto your "
        "card on the till's reader while you wait. Nothing is loaded from this page.",
        "请到柜台付现金：店员收款后，在收银台的读卡器上为您的卡充值。本页面不会充值。",
    ),
    "bad_card_number": (
        "That is not a card number: type the 20 characters (0-9, A-F) printed on the card.",
        "卡号无效：请输入卡面上印的 20 位字符（0-9、A-F）。",
    ),
    "unknown_card": (
        "We do not know this card: check the number printed on it.",
        "我们不认识此卡：请核对卡面上印的卡号。",
    ),
    "card_not_loadable": (
        "This card cannot be topped up (blocked, lost or expired).",
        "此卡无法充值（已锁定、挂失或过期）。",
    ),
    "transfer_title": ("Pay by bank transfer", "银行转账付款"),
    "transfer_help": (
        "Transfer exactly this amount from your bank account, quoting this reference. "
        "Nothing is loaded before the money has arrived.",
        "请从您的银行账户转账此金额，并注明此参考号。款项到账前不会充值。",
    ),
    "reference": ("Payment reference", "付款参考号"),
    "expires": ("Pay before", "付款截止"),
    "waiting_funds": ("Waiting for your transfer…", "等待您的转账…"),
    "funds_arrived": (
        "Your money has arrived: load it onto your card now.",
        "款项已到账：现在可以充值到卡。",
    ),
    "load_now": ("Load onto my card", "充值到我的卡"),
    "keep_link": (
        "Keep this link to come back to this top-up from any browser:",
        "请保存此链接，可在任何浏览器中回到此充值：",
    ),
    "unpaid": (
        "This top-up expired unpaid: nothing was taken and nothing was loaded.",
        "此充值未付款已过期：未扣款，也未充值。",
    ),
    "link_forged": ("This top-up link is not valid.", "此充值链接无效。"),
    "link_expired": ("This top-up link has expired.", "此充值链接已过期。"),
    "reader_choice": ("Which reader is the card on?", "卡在哪个读卡器上？"),
    "reader_this": ("This device's reader", "本设备的读卡器"),
    "reader_other": ("Another device's reader", "另一台设备的读卡器"),
    "reader_other_help": (
        "On the device with the reader, start the webpurse agent and type this code:",
        "在有读卡器的设备上运行 webpurse 代理，并输入此代码：",
    ),
    "staff": ("Staff", "店员"),
    "staff_signin": ("Staff sign-in", "店员登录"),
    "staff_name": ("Name", "用户名"),
    "password": ("Password", "密码"),
    "signin": ("Sign in", "登录"),
    "signout": ("Sign out", "退出"),
    "signin_failed": ("Wrong name or password.", "用户名或密码错误。"),
    "signin_limited": (
        "Too many attempts: wait a few minutes and try again.",
        "尝试次数过多：请等几分钟再试。",
    ),
    "till_title": ("Till: top-up in cash", "收银台：现金充值"),
    "signed_in_as": ("Signed in as", "当前店员"),
    "float_balance": ("Top-up float at settlement", "结算中心充值备付金"),
    "float_low": (
        "The top-up float is running low: ask the office to deposit more.",
        "充值备付金余额不足：请联系办公室存入更多资金。",
    ),
    "float_unavailable": ("The float could not be read just now.", "暂时无法读取备付金余额。"),
    "till_help": (
        "Count the customer's cash, type the amount, then load it onto their card on the "
        "till's reader. The float at settlement pays for the value; the cash goes in the till.",
        "清点顾客的现金并输入金额，然后在收银台读卡器上为其卡充值。充值金额由结算中心的备付金支付，现金放入收银机。",
    ),
    "cash_received": ("Cash received (¥)", "收到现金（¥）"),
    "load_cash": ("Record the cash and load the card", "记录现金并充值"),
    "bad_cash": (
        "Type the cash taken, e.g. 200 or 200.50 (¥1 to ¥1,000).",
        "请输入收到的现金，例如 200 或 200.50（¥1 至 ¥1,000）。",
    ),
    "insufficient_float": (
        "The top-up float is too low for this amount: hand the cash back. Nothing was loaded.",
        "备付金不足以支付此金额：请退还现金。未充值。",
    ),
    "settlement_error": (
        "Settlement could not be reached: hand the cash back. Nothing was loaded.",
        "无法连接结算中心：请退还现金。未充值。",
    ),
    "recent_topups": ("Today's till top-ups", "今日收银台充值"),
    "shift_report": ("Shift report", "班次报表"),
    "day": ("Day", "日期"),
    "topups_made": ("Top-ups", "充值笔数"),
    "cash_taken": ("Cash taken", "收到现金"),
    "loaded_value": ("Loaded onto cards", "已充值到卡"),
    "loads_made": ("Loads", "充值成功笔数"),
    "not_loaded": ("Cash not loaded", "未充值现金"),
    "all_staff": ("All staff", "全部店员"),
    "audit_trail": ("Audit trail", "审计记录"),
    "when": ("When", "时间"),
    "who": ("Who", "店员"),
    "action": ("Action", "操作"),
    "client": ("From", "来源"),
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
